"""Where researchers train: logging sinks (:mod:`.sinks`), a Lightning callback (:mod:`.lightning`) and a Hugging Face
``Trainer`` callback (:mod:`.transformers`). Each imports its package only when used; the packages are extras
(``pip install optmech[tensorboard]``, ``[lightning]``, ``[transformers]``, ``[wandb]``, ``[mlflow]``)."""
