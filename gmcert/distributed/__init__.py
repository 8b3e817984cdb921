"""Scale-out on torch.distributed: the process group torchrun starts, each rank's share of the
inputs, and the few collectives the commands need (:mod:`gmcert.distributed.world`)."""
from gmcert.distributed.world import World, agree, all_gather_rows, barrier, broadcast_json, current, shard, world

__all__ = ["World", "agree", "all_gather_rows", "barrier", "broadcast_json", "current", "shard", "world"]
