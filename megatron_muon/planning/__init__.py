"""The scale plan: planning at cluster scale without the cluster. Any rank of a layout built on the meta device
(``meta_build``), its exact parameter count (``rank_params``), and its Muon plan (``optim/plan.py``), memory,
communication and predicted step time for every rank (``at_scale``), for ours and megatron-core's Muon modes."""
