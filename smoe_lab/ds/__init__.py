"""DeepSpeed support: the DeepSpeed training engine, DeepSpeed-MoE layers and checkpoint interchange.

    smoe_lab.ds.engine    `fit` through deepspeed.initialize (TrainConfig.engine == "deepspeed"): data, ZeRO and
                          expert parallelism over the ranks of the `deepspeed` launcher
    smoe_lab.ds.moe       DeepSpeedMoELayer: deepspeed.moe.layer.MoE with the native layer's interface and telemetry
                          (ModelConfig.moe_impl == "deepspeed")
    smoe_lab.ds.convert   native <-> DeepSpeed-MoE state dicts, checkpoint folders and engine checkpoints

Nothing here is imported by `import smoe_lab`; engine and moe need the `deepspeed` package, convert's state-dict
mapping does not. See docs/deepspeed.md.
"""
