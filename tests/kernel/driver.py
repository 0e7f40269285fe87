"""A process that loads (or adopts) the datapath and obeys JSON lines on
stdin, so tests can SIGKILL whoever loaded the programs. ``--fresh``: compile
and attach new programs even when this build's are pinned already."""

from __future__ import annotations

import json
import sys

from tests.kernel.support import grant_from_json
from ztnet.datapath.datapath import Datapath
from ztnet.instance import Instance


def main() -> int:
    datapath = Datapath.open(Instance.resolve(sys.argv[1]), fresh="--fresh" in sys.argv[2:])
    print(json.dumps({"ok": True, "prog_ids": datapath.programs.prog_ids
                      if datapath.programs else {}}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "replace":
            result = datapath.install_unverified(grant_from_json(g) for g in request["grants"])
        elif op == "remove":
            drop = set(request["ids"])
            result = datapath.install_unverified(
                g for g in datapath.grants() if g.grant_id not in drop)
        else:
            print(json.dumps({"ok": False, "error": f"unknown op {op}"}), flush=True)
            continue
        print(json.dumps({"ok": True, "generation": result.generation}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
