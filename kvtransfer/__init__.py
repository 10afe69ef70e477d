"""KV-cache transmission between prefill and decode groups.

`plan` maps blocks between the two groups' (tp, pp) layouts, `messages` holds the commands and
events that cross process boundaries, `transport` the pairwise links (NCCL, gloo, CUDA IPC,
in-process) and `agent` each rank's side of the service: layer-wise sends during the prefill
forward, receives written into the reserved blocks, deadlines and cancellation.
"""
