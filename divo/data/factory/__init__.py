"""D4RL-style dataset factory: make offline datasets for any continuous-control Gymnasium env.

``divo.data.factory.build`` trains an online SAC agent (``divo.data.factory.sac``, TorchRL's
SAC loss, collector and replay buffer), picks policy snapshots the way D4RL did and writes Minari
datasets (``random``, ``medium``, ``expert``, ``medium-replay``, ``medium-expert``);
``divo.data.factory.pointmaze`` makes sparse-reward maze datasets with a waypoint planner.
"""
