"""Class-incremental (continual) training with experience replay: COCONUT.

``config.py`` the ``continual:`` section, ``buffer.py`` the replay memory,
``trainer.py`` the ``ContinualTrainer`` (vlp.train's Trainer, task by task). The
COCONUT loss lives in ``vlp/objectives/coconut.py``, the evaluation in
``vlp/eval/continual.py``. A package (not one module) so that ``vlp.config`` can import
the settings without importing the trainer, which imports ``vlp.config``.
"""
