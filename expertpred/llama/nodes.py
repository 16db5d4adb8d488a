"""The router nodes of llama.cpp's MoE graph, and what the one eval callback does with each.

``build_moe_ffn`` (llama.cpp ``src/llama-graph.cpp``) names its nodes ``<base>-<layer>``
(``ffn_moe_logits-12``); views get suffixes (``"ffn_moe_probs-0 (reshaped)"``) and are
matched by no plan. These names are written here once: the C callback's table
(:data:`BASE_NAMES`), the tracer's and the plugin's plans all come from this module.

A :class:`CapturePlan` maps a base name to :class:`Want` flags, the same at every MoE layer:

* the tracer (:func:`trace_plan`) probes the graph once and captures the score node the arch
  selects on, the final mixing weights and the argsort (read at the weights node through the
  pointer remembered when asked): two graph splits per MoE layer;
* the plugin (:func:`routing_plan`) needs no probe: it acts at ``ffn_moe_argsort-L``, the
  earliest node whose data names the selected experts (one split per layer), plus the router
  logits when its predictor wants them.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ExpertPredError

PREFIX = "ffn_moe_"
# Score nodes in graph order; the last one present is what the arch selects on.
SCORE_CHAIN = ("ffn_moe_logits", "ffn_moe_logits_biased", "ffn_moe_probs_biased")
SCORE_FALLBACK = "ffn_moe_probs"  # when the arch passes precomputed probabilities
# Weight nodes in graph order; the last one present holds the final mixing weights.
WEIGHT_CHAIN = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm",
                "ffn_moe_weights_scaled")
ARGSORT = "ffn_moe_argsort"  # I32 [n_expert, n_tokens], descending: first k = selection
LOGITS = "ffn_moe_logits"  # F32 [n_expert, n_tokens]: raw router logits
ROUTER_MATMUL = LOGITS  # its src[1] is the router input (ffn_norm-L)

# Every base the callback can act on, in the order of the C callback's table.
BASE_NAMES = tuple(dict.fromkeys(
    b.removeprefix(PREFIX) for b in (*SCORE_CHAIN, SCORE_FALLBACK, ARGSORT, *WEIGHT_CHAIN)))


class Want(enum.IntFlag):
    """What the callback does with a node (bit flags shared with the C callback)."""

    SCORE = 1  # say yes; copy the (n, n_expert) scores when ready
    WEIGHTS = 2  # say yes; copy weights + remembered argsort (+ router input); commit rows
    ARGSORT_PTR = 4  # remember the argsort node's pointer when asked
    ROUTER_IN = 8  # remember src[1] (the router input) when asked
    EXPERTS = 16  # say yes; copy the first k argsort columns when ready; commit rows


def node_name(base: str, layer: int) -> str:
    """``ffn_moe_argsort``, 3 -> ``ffn_moe_argsort-3`` (the name llama.cpp gives the node)."""
    return f"{base}-{layer}"


@dataclass(frozen=True)
class CapturePlan:
    """Which nodes the one callback acts on, by base name; the same at every MoE layer."""

    flags: Mapping[str, Want]  # base node name -> what the callback does with it
    score_node: str = ""  # the node whose scores are captured ("" = none)
    weight_node: str = ""  # the node whose weights are captured ("" = none)

    def by_name(self, moe_layers: Sequence[int]) -> dict[bytes, tuple[int, int]]:
        """Full node name -> (flags, MoE row): the Python callback's lookup table."""
        return {node_name(base, il).encode(): (int(f), li)
                for li, il in enumerate(moe_layers) for base, f in self.flags.items()}

    def c_flags(self) -> list[int]:
        """Flags in the order of :data:`BASE_NAMES` (the C callback's table)."""
        return [int(self.flags.get(PREFIX + b, 0)) for b in BASE_NAMES]


def routing_plan(scores: bool) -> CapturePlan:
    """The plugin's plan: experts at the argsort node, router logits if ``scores``."""
    flags = {ARGSORT: Want.EXPERTS}
    if scores:
        flags[LOGITS] = Want.SCORE
    return CapturePlan(flags, score_node=LOGITS if scores else "", weight_node="")


def trace_plan(names: Collection[bytes], layer0: int, hidden: bool, what: str) -> CapturePlan:
    """The tracer's plan from the node names of one probed graph (``layer0``: first MoE
    block): the arch's score node, its last weight node, the argsort (and router input)."""
    present = [s for s in SCORE_CHAIN if node_name(s, layer0).encode() in names]
    score = present[-1] if present else SCORE_FALLBACK
    present = [w for w in WEIGHT_CHAIN if node_name(w, layer0).encode() in names]
    if not present:
        raise ExpertPredError(f"{what}: llama.cpp graph has no {node_name(WEIGHT_CHAIN[0], layer0)}"
                              " node (expected build_moe_ffn routing)")
    flags = {score: Want.SCORE, present[-1]: Want.WEIGHTS, ARGSORT: Want.ARGSORT_PTR}
    if hidden:
        flags[ROUTER_MATMUL] = flags.get(ROUTER_MATMUL, Want(0)) | Want.ROUTER_IN
    return CapturePlan(flags, score_node=score, weight_node=present[-1])
