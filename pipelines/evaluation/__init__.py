"""Evaluation of frozen encoders: kNN and linear probes on labelled datasets (`olmoearth eval`), plus the
in-loop probe that pretraining calls every N steps (hook.py).

    readers.py / synth_task.py   datasets -> labelled chips (task.py: rows, splits)
    features.py                  encoder embeddings and the raw-band baseline
    extract.py                   Ray Data actor pool over the chips
    knn.py, linear_probe.py      the probes;  metrics.py  their scores
    score.py                     probes x feature sources -> records, Markdown table
    run.py                       one `olmoearth eval` run (config, JSON + Markdown)
    hook.py                      probe(encoder, task) for the training loop
"""
