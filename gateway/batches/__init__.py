"""Bulk embedding through OpenAI's Batch API: files and batches (``api.py``), kept where they
outlive the gateway (``store.py``), checked (``lines.py``) and run on the models' queues in the
batch priority class (``runner.py``)."""
