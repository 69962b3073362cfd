"""Many teams on one fleet: who calls (``keys.py``, ``calls.py``), how much they may
(``limits.py``), what they used (``usage.py``), and the admin API over both (``admin.py``);
``cli.py`` is the same from a shell. Fair shares and priorities are the queue's
(``queue/store.py``), fed by each call's ``Placement`` (``service.py``)."""
