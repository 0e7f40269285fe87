"""The only code that touches BPF: loading, attaching, pinning, maps, events.

Only this package imports bcc (``loader.py``) or calls the bpf() syscall
(``bpfsys.py``); everything else hands it grants and reads back counters.
"""
