"""satori: teach language models to reason by autoregressive search.

Two methods, one code path: Satori (Chain-of-Action-Thought, format tuning, PPO with
Restart-and-Explore) and LaTRO (latent reasoning optimisation by self-rewarding).
"""

__version__ = "0.1.0"
