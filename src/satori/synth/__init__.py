"""Stage 1 of Satori: synthesis of COAT demonstrations by a generator, a critic and a
selector (METHOD.md §2). :func:`run_synth` is the entry point; see
:mod:`satori.synth.pipeline` for the flow, :mod:`satori.synth.trajectory` for how feedback
is placed, :mod:`satori.synth.agents` for the critics and selectors and
:mod:`satori.synth.backends` for the hf / openai backends."""

from satori.synth.pipeline import AgentConfig, SynthConfig, run_synth

__all__ = ["AgentConfig", "SynthConfig", "run_synth"]
