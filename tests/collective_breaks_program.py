"""A two-process program whose checkpoint write meets a broken collective
(tests/test_lost_peer_in_a_collective.py runs it, one process per id).

Both processes save checkpoint 1 together. Then, with `--peer_dies`, process 1
kills itself (SIGKILL) and process 0 writes checkpoint 2 through a real collective,
which gloo fails at once (`Connection reset/closed by peer`). That is what CI saw
when a peer was killed during an Orbax save: the write's error came seconds before
the watchdog's verdict and blamed the disk. Without `--peer_dies`, process 1 stays
alive and process 0's collective fails anyway (a runtime error raised by hand: a
transport cannot be broken on loopback with both ends up), so the wait must end and
the write's own error be reported.

The collective runs inside Checkpointer's error wrapping (`_raise_write_error_from`),
the path Orbax's own collectives take in `save`; a save cannot be made to reach its
collective at the moment a peer dies.
"""

import os
import signal
import sys
import time

from t5x_like.launch import launcher


def main() -> None:
    parser = launcher.flag_parser(__doc__, prog="collective_breaks_program")
    launcher.add_process_flags(parser)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--peer_dies", action="store_true")
    args, _ = launcher.parse_flags(parser, sys.argv[1:])
    launcher.configure_output(args.verbosity)
    with launcher.errors_reported(args.verbosity):
        launcher.start_jax(args)
        import jax
        import numpy as np
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from t5x_like.checkpointing import checkpoints
        launcher.watch_checkpoints(args.directory)
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)),
                                 PartitionSpec("data"))
        state = {"w": jax.make_array_from_callback((8,), sharding,
                                                   lambda index: np.arange(8.0)[index])}
        saver = checkpoints.Checkpointer(directory=args.directory)
        saver.save(1, state, data_position={"step": 1})
        saver.wait_until_finished()
        multihost_utils.sync_global_devices("checkpoint 1 is complete")
        print("checkpoint 1 saved", flush=True)
        if jax.process_index() == 1:
            if args.peer_dies:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)                    # alive, answering, until told to leave
            return
        time.sleep(1.0)                        # the peer is dead by now (--peer_dies)

        def collective() -> None:
            if args.peer_dies:
                multihost_utils.process_allgather(np.arange(4))
            else:
                raise jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: "
                                                 "raised by the test, peers alive")
        saver._raise_write_error_from(collective, 2)


if __name__ == "__main__":
    launcher.run_program(main)
