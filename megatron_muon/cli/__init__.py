"""The command lines for data and checkpoints (``tools/train_tokenizer.py``, ``tools/preprocess_data.py``,
``tools/convert_checkpoint.py`` are thin wrappers over the modules here, which tests import normally). Importing
this package imports nothing."""
