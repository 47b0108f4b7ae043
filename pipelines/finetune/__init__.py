"""Fine-tuning: the encoder plus a task head trained on labels with Ray Train + DeepSpeed (`olmoearth finetune`).

    data.py / pairs.py   labelled data: the evaluation readers, label rasters, splits, checks, fixed-size batches
    config.py ...        the job (schedules, loop, metrics, checkpoints, export)
"""
