"""The process that holds a mount made without root in a user namespace (see
tosi_tools.userns): `python -m tosi_tools.cli.holder TARGET`, started by tosi-mount
with the mount's parameters as JSON on stdin. It forks: the first process exits at
once (so its caller waits for nothing), the second detaches, enters the namespaces,
mounts, answers "ok <pid>" or "error <message>" on stdout, and stays until SIGTERM.
Not a command for people: its command line is how tosi-mount --unmount finds it."""

import json
import os
import sys


def main() -> int:
    target = sys.argv[1]
    params = json.load(sys.stdin)
    if os.fork():
        return 0
    os.setsid()
    from .. import userns

    try:
        userns.hold(target, params, 1)
    except BaseException:
        return 1
    return 0


if __name__ == "__main__":
    status = main()
    # No interpreter clean-up in the forked holder: nothing of it is the caller's.
    sys.stdout.flush()
    os._exit(status)
