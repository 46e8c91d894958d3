"""The small-model settings, in one place: every real train.py, lr_find and sweep process of the tests
and of bench/soak.py starts from these override lists. A list that changes a key of one of them goes
through tests.helpers.processes.merged() (train.py refuses a key given twice).
"""
from __future__ import annotations

# The micro DeepSpeech2: 4 conv channels, one RNN layer of 32 units.
MICRO_MODEL = ["model.conv_channels=4", "model.rnn_hidden=32", "model.rnn_layers=1"]
# ... trained on 48 utterances, 8 of them validated, without a progress bar
MICRO = [*MICRO_MODEL, "dataset.max_utterances=48", "trainer.max_eval_utterances=8", "trainer.progress=false"]
# ... in batches of 4 (the dataset's own number of length buckets)
MICRO_BATCH4 = [*MICRO, "dataset.batch_size=4"]
# ... from 2 length buckets
SMALL = [*MICRO_BATCH4, "dataset.num_buckets=2"]
# MICRO for 3 steps: a sweep's jobs
MICRO_3_STEPS = [*MICRO, "trainer.max_steps=3"]
