"""LightGBM trees as flat numpy node arrays, evaluated for all trees of a group at once.

:func:`flatten_boosters` turns boosters (``Booster.dump_model()``, needs lightgbm) into node
arrays — split feature, threshold, children, leaf values, decision type incl. categorical
bitsets, missing type and default_left. :class:`Forest` evaluates them with numpy only: each
node's decision gives each node's next node, ``depth`` gathers walk every tree to its leaf,
and leaf values summed per expert in float64 are LightGBM's raw score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from .checks import ArtifactCheck

MISSING = {"None": 0, "Zero": 1, "NaN": 2}
K_ZERO = 1e-35  # LightGBM's kZeroThreshold


@dataclass
class Forest:
    """The trees of one LightGBM group (all experts), as flat node arrays (local ids)."""

    feature: np.ndarray  # int32 (N,) split feature; 0 for leaves
    threshold: np.ndarray  # float64 (N,)
    left: np.ndarray  # int32 (N,) leaves point to themselves
    right: np.ndarray  # int32 (N,)
    value: np.ndarray  # float64 (N,) leaf value, 0 for internal nodes
    roots: np.ndarray  # int32 (T,)
    expert_of: np.ndarray  # (T, E) float64 0/1: which expert's score a tree adds to
    depth: int
    default_left: np.ndarray  # bool (N,)
    missing: np.ndarray  # int8 (N,) MISSING values
    cat_bits: np.ndarray | None  # uint32 (N, W) categories going left; None: no cat split
    is_cat: np.ndarray | None  # bool (N,)
    zero_missing: bool = False
    nan_missing: bool = False

    def raw_row(self, x: np.ndarray) -> np.ndarray | None:
        """float64 (1, E) for one row of numeric splits without NaN, else None (use
        :meth:`raw_scores`). Same decisions, fewer passes: gather the 1-D row once."""
        if self.cat_bits is not None or self.zero_missing:
            return None
        x64 = x[0].astype(np.float64)
        if np.isnan(x64).any():  # NaN: missing-value rules of the general path
            return None
        nxt = np.where(x64[self.feature] <= self.threshold, self.left, self.right)
        cur = self.roots
        for _ in range(self.depth):
            cur = nxt[cur]
        return (self.value[cur] @ self.expert_of)[None]

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """float64 (n, E): the sum of each expert's trees (LightGBM's raw score)."""
        if len(x) == 1:
            raw = self.raw_row(x)
            if raw is not None:
                return raw
        v = x[:, self.feature].astype(np.float64)  # (n, N)
        nan = np.isnan(v)
        has_nan = bool(nan.any())
        v0 = np.where(nan, 0.0, v) if has_nan else v
        go_left = v0 <= self.threshold
        if self.zero_missing:
            zero = (self.missing == 1) & (np.abs(v0) <= K_ZERO)
            go_left = np.where(zero, self.default_left, go_left)
        if self.nan_missing and has_nan:
            go_left = np.where((self.missing == 2) & nan, self.default_left, go_left)
        if self.cat_bits is not None:
            iv = np.where(nan, -1, v0).astype(np.int64)
            ok = (iv >= 0) & (iv < 32 * self.cat_bits.shape[1])
            ivc = np.where(ok, iv, 0)
            node = np.broadcast_to(np.arange(len(self.feature)), iv.shape)
            bit = (self.cat_bits[node, ivc >> 5] >> (ivc & 31).astype(np.uint32)) & 1
            go_left = np.where(self.is_cat, ok & (bit == 1), go_left)
        nxt = np.where(go_left, self.left, self.right)  # (n, N): each node's next node
        if len(x) == 1:  # 1-D gathers: the online case
            nxt1, cur1 = nxt[0], self.roots
            for _ in range(self.depth):
                cur1 = nxt1[cur1]
            return (self.value[cur1] @ self.expert_of)[None]
        cur = np.broadcast_to(self.roots, (len(x), len(self.roots)))
        for _ in range(self.depth):
            cur = np.take_along_axis(nxt, cur, axis=1)
        return self.value[cur] @ self.expert_of


def flatten_boosters(models: Sequence[str], n_groups: int,
                     e: int) -> tuple[dict[str, np.ndarray], list[int], int]:
    """Node arrays of the boosters ``models[g * e + j]`` (group g, expert j; "" = none),
    each group's depth and the boosters' input width (-1: no booster). Needs lightgbm
    (training side only)."""
    import lightgbm as lgb

    nodes: list[dict[str, Any]] = []
    tree_root: list[int] = []
    tree_group: list[int] = []
    tree_expert: list[int] = []
    group_nodes: list[tuple[int, int]] = []
    depths: list[int] = []
    n_features = -1
    has_trees = np.zeros((n_groups, e), dtype=bool)
    for gi in range(n_groups):
        lo, depth = len(nodes), 0
        for j in range(e):
            s = models[gi * e + j]
            if not s:
                continue
            dump = lgb.Booster(model_str=s).dump_model()
            if dump.get("num_tree_per_iteration", 1) != 1 or dump.get("average_output"):
                raise ExpertPredError("lightgbm: expected one binary tree per iteration")
            n_features = int(dump["max_feature_idx"]) + 1
            has_trees[gi, j] = True
            for t in dump["tree_info"]:
                tree_root.append(len(nodes))
                tree_group.append(gi)
                tree_expert.append(j)
                depth = max(depth, _flatten_tree(t["tree_structure"], nodes))
        group_nodes.append((lo, len(nodes)))
        depths.append(depth)
    arrays = _node_arrays(nodes)
    arrays.update({
        "has_trees": has_trees, "tree_root": np.array(tree_root, dtype=np.int32),
        "tree_group": np.array(tree_group, dtype=np.int32),
        "tree_expert": np.array(tree_expert, dtype=np.int32),
        "group_nodes": np.array(group_nodes, dtype=np.int64).reshape(-1, 2),
    })
    return arrays, depths, n_features


def _node_arrays(nodes: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    n = len(nodes)
    max_cat = max((max(r["cats"], default=0) for r in nodes if "cats" in r), default=-1)
    words = max(1, (max_cat + 32) // 32) if max_cat >= 0 else 1
    cat_bits = np.zeros((n, words), dtype=np.uint32)
    is_cat = np.zeros(n, dtype=bool)
    for i, r in enumerate(nodes):
        if "cats" in r:
            is_cat[i] = True
            for c in r["cats"]:
                cat_bits[i, c >> 5] |= np.uint32(1 << (c & 31))
    return {
        "node_feature": np.array([r["feature"] for r in nodes], dtype=np.int32),
        "node_threshold": np.array([r["threshold"] for r in nodes], dtype=np.float64),
        "node_left": np.array([r["left"] for r in nodes], dtype=np.int32),
        "node_right": np.array([r["right"] for r in nodes], dtype=np.int32),
        "node_value": np.array([r["value"] for r in nodes], dtype=np.float64),
        "node_default_left": np.array([r["default_left"] for r in nodes], dtype=bool),
        "node_missing": np.array([r["missing"] for r in nodes], dtype=np.int8),
        "node_is_cat": is_cat, "node_cat_bits": cat_bits,
    }


def group_forests(a: Mapping[str, np.ndarray], depths: Sequence[int],
                  e: int) -> list[Forest | None]:
    """One :class:`Forest` per group of the node arrays ``a`` (None: no tree)."""
    out: list[Forest | None] = []
    for gi in range(len(a["group_nodes"])):
        lo, hi = (int(v) for v in a["group_nodes"][gi])
        trees = np.flatnonzero(a["tree_group"] == gi)
        if len(trees) == 0:
            out.append(None)
            continue
        is_cat = a["node_is_cat"][lo:hi]
        miss = a["node_missing"][lo:hi]
        expert_of = np.zeros((len(trees), e), dtype=np.float64)
        expert_of[np.arange(len(trees)), a["tree_expert"][trees]] = 1.0
        out.append(Forest(
            feature=a["node_feature"][lo:hi].astype(np.intp),
            threshold=a["node_threshold"][lo:hi],
            left=a["node_left"][lo:hi] - lo, right=a["node_right"][lo:hi] - lo,
            value=a["node_value"][lo:hi], roots=(a["tree_root"][trees] - lo).astype(np.intp),
            expert_of=expert_of, depth=int(depths[gi]),
            default_left=a["node_default_left"][lo:hi], missing=miss,
            cat_bits=a["node_cat_bits"][lo:hi] if is_cat.any() else None,
            is_cat=is_cat if is_cat.any() else None,
            zero_missing=bool((miss == 1).any()), nan_missing=bool((miss == 2).any())))
    return out


def _flatten_tree(root: Mapping[str, Any], nodes: list[dict[str, Any]]) -> int:
    """Append a dumped tree's nodes (preorder, global ids) to ``nodes``; returns its depth.

    A leaf's children are itself, so walking ``depth`` steps from any root ends on a leaf.
    """
    stack: list[tuple[Mapping[str, Any], int, int]] = [(root, -1, 0)]  # node, parent slot, depth
    depth = 0
    while stack:
        node, parent, dep = stack.pop()
        idx = len(nodes)
        if parent >= 0:
            slot = nodes[parent // 2]
            slot["left" if parent % 2 == 0 else "right"] = idx
        depth = max(depth, dep)
        if "split_feature" in node:
            rec = {"feature": int(node["split_feature"]), "left": -1, "right": -1,
                   "value": 0.0, "default_left": bool(node.get("default_left", True)),
                   "missing": MISSING[str(node.get("missing_type", "None"))]}
            if node.get("decision_type", "<=") == "==":
                rec["cats"] = [int(c) for c in str(node["threshold"]).split("||") if c != ""]
                rec["threshold"] = 0.0
            elif node.get("decision_type", "<=") == "<=":
                rec["threshold"] = float(node["threshold"])
            else:
                raise ExpertPredError(f"lightgbm tree: decision_type "
                                      f"{node.get('decision_type')!r}, expected <= or ==")
            nodes.append(rec)
            stack.append((node["right_child"], 2 * idx + 1, dep + 1))
            stack.append((node["left_child"], 2 * idx, dep + 1))
        else:
            nodes.append({"feature": 0, "threshold": 0.0, "left": idx, "right": idx,
                          "value": float(node["leaf_value"]), "default_left": True,
                          "missing": 0})
    return depth


def check_trees(c: ArtifactCheck, bounds: np.ndarray, left: np.ndarray, right: np.ndarray,
                 roots: np.ndarray, tree_group: np.ndarray, depth: list[int]) -> None:
    """Nodes are preorder: a split's children come after it and inside its group's range; a
    leaf points at itself; no node is deeper than its group's walk depth."""
    n = len(left)
    if n == 0:
        if len(roots):
            raise c.fail("trees without nodes")
        return
    idx = np.arange(n)
    group_of = np.searchsorted(bounds[:, 1], idx, side="right")
    leaf = (left == idx) & (right == idx)
    split = ~leaf
    lo, hi = bounds[group_of, 0], bounds[group_of, 1]
    for name, child in (("node_left", left), ("node_right", right)):
        bad = split & ((child <= idx) | (child < lo) | (child >= hi))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise c.fail(f"array {name!r}: node {i} points at {int(child[i])}, expected a later "
                         f"node of its group ({int(lo[i])}..{int(hi[i]) - 1}) or itself (leaf)")
    if (roots < bounds[tree_group, 0]).any() or (roots >= bounds[tree_group, 1]).any():
        raise c.fail("array 'tree_root': a root outside its group's nodes")
    node_depth = np.zeros(n, dtype=np.int64)
    for i in np.flatnonzero(split):  # preorder: a parent is final before its children
        node_depth[left[i]] = max(node_depth[left[i]], node_depth[i] + 1)
        node_depth[right[i]] = max(node_depth[right[i]], node_depth[i] + 1)
    allowed = np.asarray(depth, dtype=np.int64)[group_of]
    if (node_depth > allowed).any():
        i = int(np.flatnonzero(node_depth > allowed)[0])
        raise c.fail(f"node {i} is at depth {int(node_depth[i])}, spec.depth allows "
                     f"{int(allowed[i])}")
