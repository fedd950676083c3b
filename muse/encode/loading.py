"""The lock every model load in the encoders takes (text.py, image.py, shards.Encoders).

transformers/diffusers patch torch globally while they build a model (meta-device init),
which is not thread-safe: Prefect runs tasks in threads, so loads go one at a time.
"""

import threading

LOAD_LOCK = threading.RLock()  # re-entrant: Encoders.get holds it while the loaders take it again
