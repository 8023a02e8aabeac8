"""megatron-muon: parallel-aware Muon and MoE pretraining on Megatron-Core."""

__version__ = "0.1.0"
