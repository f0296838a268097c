"""Inference cost: expert-parallel latency profiles and the dense-equivalent size of routed models.

    smoe_lab.inference.ep_profile   `smoe-lab profile`: launches the ranks (gloo / NCCL on 127.0.0.1), profiles
                                    models side by side, writes profile.csv (needs the `deepspeed` extra)
    smoe_lab.inference.ep_worker    one rank of a profile (DeepSpeed-MoE layers, DeepSpeed's all-to-all timers)
    smoe_lab.inference.scaling      Clark et al. 2022's routed scaling law: effective (dense-equivalent) parameters
    smoe_lab.inference.study        notebook 04's inference stages: profile the variants and reduced models
    smoe_lab.inference.figures      Figs 2a, 2b, 4, 5 and the payoff figure (plotly)

`smoe_lab.profile` stays the single-process timer (whole model and the native MoE layer's stages).
"""
