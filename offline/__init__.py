"""Offline batch inference (infer.py): many images and questions in, one JSON line per answer out.

    inputs.py   a JSON-lines file or a folder of images -> Records (a bad line is a Record with an error)
    outputs.py  the append-only output file: ids already answered (resume), flushed and synced writes
    runner.py   Records -> output dicts on one machine: loader threads decode images while the model
                generates, prompts bucketed by length, one ChatEngine batch per bucket
    ray_job.py  the same Runner on a Ray cluster: Ray Data map_batches over a pool of model actors
"""
