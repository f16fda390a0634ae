"""ZeroOptimizer: ZeRO-1/2 sharded optimizer state over torch.distributed.

Stage 0 is plain data parallelism (gradients all-reduced, a full optimizer on every rank).
Stage 1 keeps the optimizer state (and fp32 master weights of bf16/fp16 parameters) only for
the slice of parameters a rank owns: gradients accumulate locally and are reduce-scattered at
``step()``; the updated slices are all-gathered back into the parameters. Stage 2 also shards
the gradients: each bucket is reduce-scattered during backward as soon as its gradients are
ready, and only the owned slice is kept.

Per rank, with N ranks, P parameters, S bytes of optimizer state per parameter and
B bytes per parameter element (the parameter dtype):

| stage | communication per step | gradient memory | state memory |
| --- | --- | --- | --- |
| 0 | all-reduce (2 P B) | P B | P S |
| 1 | reduce-scatter + all-gather (2 P B) | P B | P S / N |
| 2 | reduce-scatter per micro-batch + all-gather | ~ (P / N + 2 buckets) B | P S / N |

One job per module: ``optimizer`` (construction and the step), ``view`` (the public,
read-only view of its layout and shards, ``ZeroOptimizer.shard_view``), ``bucketer`` (stage
2's gradient hooks and staging buffers), ``collectives`` (who sends what to whom, and why
gloo uses reduce/broadcast), ``checkpoint`` (the sharded and the consolidated formats, read
through the view only); the layout arithmetic is ``optimizers.zero_layout``.
"""

from .optimizer import ZeroOptimizer
from .view import ParamClass, ParamGroup, ParamInfo, Shard, ShardView

__all__ = ["ParamClass", "ParamGroup", "ParamInfo", "Shard", "ShardView", "ZeroOptimizer"]
