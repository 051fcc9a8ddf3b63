"""The report's drawing of the network: its image path as a layered DAG, chains collapsed.

A diffusers UNet's image path has hundreds of nodes; drawn one per node in one column
(the first version) the skips vanish and the labels shrink to nothing.  Here:

1. **chains collapse**: a run of nodes each with one input and one output on the path
   becomes one block, labelled with what it holds (``conv k3 x4, norm x4, pointwise x8``);
2. **layers** are longest-path depths (a block sits one layer after its deepest input), laid
   out left to right, parallel blocks of a layer stacked;
3. **skips stay visible**: an edge that jumps more than one layer is drawn as an arc;
4. **colour** says what a block holds: a breaker of equivariance (red: border padding;
   purple: stride or pooling; orange: a global op; brown: position), else blue for
   convolutions, grey for the rest.

Like the rest of the report, this only reads the traced graph.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from .report_html import _img, _plt

__all__ = ["collapse_chains", "layered_positions", "graph_figure", "BREAKER_COLOURS"]

BREAKER_COLOURS = {"boundary": "#d64545", "stride": "#8e5cc4", "global-op": "#f0a030", "position": "#8b5a2b"}
CONV_COLOUR, OTHER_COLOUR = "#5b9bd5", "#bbbbbb"


def _op_label(d: dict) -> str:
    lab = str(d.get("kind") or "op")
    k = d.get("kernel")
    if k:
        lab += f" k{k[0] if isinstance(k, (list, tuple)) else k}"
    s = d.get("stride")
    s = s[0] if isinstance(s, (list, tuple)) else s
    if s not in (None, 1, "1"):
        lab += f" s{s}"
    return lab


def collapse_chains(graph) -> tuple:
    """(block graph, members): every maximal chain of the DAG (nodes with one predecessor and
    one successor, whose predecessor has one successor) merged into one block, named by its
    first node; ``members[block]`` lists the nodes in order."""
    import networkx as nx

    head = {}
    for n in nx.topological_sort(graph):
        preds = list(graph.predecessors(n))
        if len(preds) == 1 and graph.out_degree(preds[0]) == 1 and graph.in_degree(n) == 1:
            head[n] = head[preds[0]]
        else:
            head[n] = n
    members: dict = {}
    for n in nx.topological_sort(graph):
        members.setdefault(head[n], []).append(n)
    blocks = nx.DiGraph()
    blocks.add_nodes_from(members)
    for u, v in graph.edges:
        if head[u] != head[v]:
            blocks.add_edge(head[u], head[v])
    return blocks, members


def layered_positions(blocks) -> dict:
    """``{block: (layer, slot)}``: layer = longest-path depth, slot = centred order in the layer."""
    import networkx as nx

    depth = {}
    for n in nx.topological_sort(blocks):
        depth[n] = max((depth[p] + 1 for p in blocks.predecessors(n)), default=0)
    layers: dict = {}
    for n in nx.topological_sort(blocks):
        layers.setdefault(depth[n], []).append(n)
    pos = {}
    for d, nodes in layers.items():
        for i, n in enumerate(nodes):
            pos[n] = (d, i - (len(nodes) - 1) / 2)
    return pos


def _block_style(graph, nodes: list) -> tuple[str, str]:
    """(colour, label) of a block from its members' kinds and breakers."""
    kinds = Counter(_op_label(graph.nodes[n]) for n in nodes)
    brk = Counter(b for n in nodes for b in (graph.nodes[n].get("breakers") or []))
    colour = next((c for k, c in BREAKER_COLOURS.items() if brk.get(k)), None)
    if colour is None:
        colour = CONV_COLOUR if any(graph.nodes[n].get("kind") in ("conv", "conv_transpose") for n in nodes) \
            else OTHER_COLOUR
    parts = [f"{k}" + (f" x{c}" if c > 1 else "") for k, c in kinds.most_common(3)]
    if len(kinds) > 3:
        parts.append("...")
    return colour, ", ".join(parts)


def graph_figure(graph, max_nodes: int = 2000) -> Optional[str]:
    """HTML ``<img>`` of the image path, or None when there is nothing to draw."""
    import networkx as nx

    if graph is None:
        return None
    nodes = [n for n, d in graph.nodes(data=True) if d.get("on_path")]
    if not nodes or len(nodes) > max_nodes:
        return None
    sub = graph.subgraph(nodes)
    if not nx.is_directed_acyclic_graph(sub):
        return None
    blocks, members = collapse_chains(sub)
    pos = layered_positions(blocks)
    n_layers = 1 + max(x for x, _ in pos.values())
    height = 1 + max(y for _, y in pos.values()) - min(y for _, y in pos.values())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(18.0, max(5.0, 0.55 * n_layers)), min(8.0, max(3.0, 0.9 * height + 2.4))),
                           dpi=90)
    for u, v in blocks.edges:
        (x0, y0), (x1, y1) = pos[u], pos[v]
        skip = x1 - x0 > 1
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-", lw=0.9 if skip else 0.7, color="#555" if skip else "#999",
                                    connectionstyle=f"arc3,rad={-0.35 if skip else 0.0}", shrinkA=4, shrinkB=4))
    for i, (b, (x, y)) in enumerate(sorted(pos.items(), key=lambda kv: kv[1])):
        colour, label = _block_style(sub, members[b])
        size = 40 + 12 * min(len(members[b]), 20)
        ax.scatter([x], [y], s=size, c=colour, zorder=3, edgecolors="#333", linewidths=0.4)
        if colour == OTHER_COLOUR:
            continue                          # reshapes, concatenations, pointwise ops: the drawing says enough
        up = i % 2 == 0                       # neighbours' labels alternate above and below
        ax.annotate(label[:34], (x, y), xytext=(3, 6 if up else -6), textcoords="offset points", fontsize=6,
                    rotation=35 if up else -35, ha="left", va="bottom" if up else "top", zorder=4)
    ax.set_xlim(-0.7, n_layers - 0.3)
    ys = [y for _, y in pos.values()]
    ax.set_ylim(min(ys) - 1.6, max(ys) + 1.6)
    ax.set_axis_off()
    n_skips = sum(1 for u, v in blocks.edges if pos[v][0] - pos[u][0] > 1)
    ax.set_title(f"image path, input left: {len(nodes)} ops in {blocks.number_of_nodes()} blocks (chains collapsed), "
                 f"{n_skips} skip(s) as arcs. red border padding, purple stride, orange global op, "
                 f"blue conv, grey other (unlabelled)", fontsize=7)
    fig.tight_layout()
    return _img(fig, "layered graph of the network's image path")
