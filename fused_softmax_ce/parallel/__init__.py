"""Vocab parallel: the classes of every row sharded across the ranks of a
torch.distributed process group (``process_group=`` of `cross_entropy` and
`linear_cross_entropy`). shards.py holds the algebra and the collectives;
cross_entropy.py and linear.py the two paths."""
