"""The command lines for data, checkpoints and the scale plan (``tools/train_tokenizer.py``,
``tools/preprocess_data.py``, ``tools/convert_checkpoint.py``, ``tools/plan_at_scale.py``, ``tools/plot_scaling.py``
are thin wrappers over the modules here, which tests import normally). Importing this package imports nothing."""
