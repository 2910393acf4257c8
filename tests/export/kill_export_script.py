"""``qft export`` in a process that SIGKILLs itself at a chosen point of the write (test_export_kill.py).

``python kill_export_script.py WHEN -- <qft export arguments>``; WHEN is ``none`` (run to the end),
``writing`` (the whole result written into the hidden work directory, not yet renamed) or ``swapping``
(in an ``--overwrite`` swap, after the old result was moved aside and before the new one is renamed in).
"""
import os
import signal
import sys

from qft.export import checkpoint


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    when, args = sys.argv[1], sys.argv[3:]
    if when == "writing":  # everything is written into the hidden directory; the rename never comes
        checkpoint._swap_into_place = lambda *a, **k: die()
    elif when == "swapping":
        real_rename, calls = checkpoint.os.rename, []

        def rename_then_die(src, dst):
            real_rename(src, dst)
            calls.append(dst)
            if len(calls) == 1:  # out -> .old-.../out done; tmp -> out not yet
                die()

        checkpoint.os.rename = rename_then_die
    from qft.cli import main as qft_main

    qft_main(["export", *args])


if __name__ == "__main__":
    main()
