"""The bounded KV cache and its eviction policies (pure torch, no model code, no ROS)."""
from .kv_cache import BoundedKVCache
from .policies import (DEFAULT_POLICY, POLICIES, EvictionPolicy, FullPolicy, H2OConfig, H2OKindsConfig, H2OKindsPolicy,
                       H2OPolicy, InfMLLMConfig, InfMLLMPolicy, StreamingLLMConfig, StreamingLLMPolicy, keep_top,
                       make_policy)

__all__ = ["BoundedKVCache", "DEFAULT_POLICY", "POLICIES", "EvictionPolicy", "FullPolicy", "H2OConfig",
           "H2OKindsConfig", "H2OKindsPolicy", "H2OPolicy", "InfMLLMConfig", "InfMLLMPolicy", "StreamingLLMConfig",
           "StreamingLLMPolicy", "keep_top", "make_policy"]
