"""The Graph tab: an image's pruned attribution graph drawn layer by layer, its patch nodes on the image, the node
a click picks, and the graph as circuit-tracer's JSON.

Tokens are columns (the CLS token, then the patches in reading order), layers rows (embeddings below, the logits
on top); a cell's nodes sit side by side. Hovering a node lists its strongest edges in and out with their weights;
clicking one (a small script passes the click to a hidden textbox, :data:`CLICK_JS`) opens a feature's card on the
Features tab, or shows where a patch node sits on the image. Like the other panels, it turns results of
:mod:`.graph` into {component: value}; the callbacks live in :class:`..ui.App`.
"""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go
from PIL import Image

from .graph import EDGE_SHARE, NODE_SHARE, GraphEdge, ImageGraph
from .overlays import heat_overlay

EDGES_DRAWN = 800  # the strongest edges drawn (all kept edges are in the JSON)
KIND_STYLE = {"feature": ("circle", "#4c78a8"), "error": ("square", "#9d9d9d"), "embedding": ("diamond", "#54a24b"),
              "logit": ("star", "#e45756")}
CLICKED_CLASS = "graph-clicked"
CSS = f".{CLICKED_CLASS} {{display: none}}"
# Runs once per page: binds plotly_click on each new graph plot and writes "<node index>|<time>" to the hidden box.
CLICK_JS = """() => {
  setInterval(() => {
    const plot = document.querySelector('#graph_plot .js-plotly-plot');
    if (!plot || plot._cltBound || !plot.on) return;
    plot._cltBound = true;
    plot.on('plotly_click', (event) => {
      const point = event.points.find((p) => p.customdata !== undefined && p.customdata !== null);
      if (!point) return;
      const box = document.querySelector('#graph_clicked textarea, #graph_clicked input');
      box.value = `${point.customdata}|${Date.now()}`;
      box.dispatchEvent(new Event('input', {bubbles: true}));
    });
  }, 300);
}"""


def _positions(graph: ImageGraph) -> tuple[list[tuple[float, float]], float]:
    """Each node's (x, y), its token's column and its layer's row, spread within the cell; and where the patches
    begin. Patch columns are 1 wide; the CLS column widens with its busiest cell (a CLS graph has every feature
    there)."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i, node in enumerate(graph.nodes):
        cells.setdefault((node.layer, node.token), []).append(i)
    cls_width = min(max([0.3 * len(m) for (_, token), m in cells.items() if token == 0] + [0.8]), 12.0)
    first_patch = cls_width / 2 + 1.0
    positions = [(0.0, 0.0)] * len(graph.nodes)
    for (layer, token), members in cells.items():
        members.sort(key=lambda i: -graph.nodes[i].influence)
        centre, width = (0.0, cls_width) if token == 0 else (first_patch + token - 1, 0.8)
        step = min(width / len(members), 0.3)
        for j, i in enumerate(members):
            positions[i] = (centre + (j - (len(members) - 1) / 2) * step, float(layer))
    return positions, first_patch


def _edge_text(graph: ImageGraph, edges: list[GraphEdge], incoming: bool) -> str:
    if not edges:
        return "none kept"
    return "<br>".join(f"  {e.weight:+.4f} {'from' if incoming else 'to'} "
                       f"{graph.nodes[e.source if incoming else e.target].label}" for e in edges)


def node_hover(graph: ImageGraph, i: int) -> str:
    node = graph.nodes[i]
    value = "" if node.activation is None else f"<br>activation {node.activation:.4f}"
    return (f"<b>{node.label}</b>{value}<br>influence {node.influence:.4f}<br>strongest edges in:<br>"
            f"{_edge_text(graph, graph.incoming(i), True)}<br>strongest edges out:<br>"
            f"{_edge_text(graph, graph.outgoing(i), False)}")


def graph_figure(graph: ImageGraph) -> go.Figure:
    """The pruned graph: edges coloured by sign (blue excites, red inhibits), thicker when stronger; nodes by kind,
    sized by influence."""
    positions, first_patch = _positions(graph)
    figure = go.Figure()
    drawn = sorted(graph.edges, key=lambda e: -abs(e.weight))[:EDGES_DRAWN]
    strongest = max((abs(e.weight) for e in drawn), default=1.0) or 1.0
    for sign, colour in ((1, "rgba(76,120,168,{})"), (-1, "rgba(228,87,86,{})")):
        for low, high, width in ((0.0, 0.1, 0.5), (0.1, 0.4, 1.5), (0.4, 1.01, 3.0)):
            xs, ys = [], []
            for e in drawn:
                if (e.weight > 0) == (sign > 0) and low <= abs(e.weight) / strongest < high:
                    (x0, y0), (x1, y1) = positions[e.source], positions[e.target]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
            if xs:
                figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                            line={"width": width, "color": colour.format(0.25 + 0.5 * high)}))
    top = max((n.influence for n in graph.nodes), default=1.0) or 1.0
    for kind, (symbol, colour) in KIND_STYLE.items():
        members = [i for i, n in enumerate(graph.nodes) if n.kind == kind]
        if not members:
            continue
        figure.add_trace(go.Scatter(
            x=[positions[i][0] for i in members], y=[positions[i][1] for i in members], mode="markers", name=kind,
            customdata=members, hovertext=[node_hover(graph, i) for i in members], hoverinfo="text",
            marker={"symbol": symbol, "color": colour, "line": {"width": 0.5, "color": "#333"},
                    "size": [8 + 14 * (graph.nodes[i].influence / top) ** 0.5 for i in members]}))
    n_patches = graph.grid[0] * graph.grid[1]
    ticks = [0.0] + [first_patch + t for t in range(0, n_patches, graph.grid[1])]
    labels = ["CLS"] + [f"row {r}" for r in range(graph.grid[0])]
    figure.update_layout(
        height=520, margin={"l": 60, "r": 10, "t": 30, "b": 40}, hovermode="closest", clickmode="event",
        legend={"orientation": "h", "y": 1.02, "x": 1.0, "xanchor": "right", "yanchor": "bottom"},
        xaxis={"tickvals": ticks, "ticktext": labels, "title": "token (CLS, then patches row by row)",
               "showgrid": False, "zeroline": False},
        yaxis={"tickvals": list(range(-1, graph.n_layers + 1)),
               "ticktext": ["embed"] + [f"layer {i}" for i in range(graph.n_layers)] + ["logit"], "zeroline": False})
    return figure


class GraphPanel:
    """The Graph tab's controls, figure, image, clicked node and download."""

    def __init__(self, classnames: list[str]):
        gr.Markdown("### Attribution graph\nWhich features, through which paths, build the prediction of the CLT "
                    "replacement chosen on the Explore tab. Attention patterns and LayerNorm scales are frozen at "
                    "this image, so every path is linear and each edge is a direct effect (circuit-tracer's "
                    "linearisation); error nodes are the teacher's MLP outputs where the teacher's MLP still runs. "
                    "Pruned to the nodes and edges that carry most of the influence on the logit. Hover a node for "
                    "its edges; click a feature to open its card.")
        with gr.Row():
            self.classes = gr.Dropdown(classnames, multiselect=True, elem_id="graph_classes", allow_custom_value=True,
                                       label="Explain the logits of (empty: the replaced model's top-1)")
            self.node_share = gr.Slider(0.5, 1.0, value=NODE_SHARE, step=0.01, elem_id="graph_node_share",
                                        label="Keep the nodes carrying this share of the influence")
            self.edge_share = gr.Slider(0.5, 1.0, value=EDGE_SHARE, step=0.005, elem_id="graph_edge_share",
                                        label="Keep the edges carrying this share")
            self.build = gr.Button("Build the graph", variant="primary", elem_id="build_graph")
        self.summary = gr.Markdown(label="Graph summary", elem_id="graph_summary")
        with gr.Row():
            self.plot = gr.Plot(label="Attribution graph", elem_id="graph_plot", scale=3)
            with gr.Column(scale=1):
                self.image = gr.Image(label="Patch nodes on the image (their influence)", type="pil",
                                      interactive=False, height=220, elem_id="graph_image")
                self.node = gr.Markdown(label="Clicked node", elem_id="graph_node")
                self.download = gr.File(label="The graph in circuit-tracer's JSON format", elem_id="graph_json")
        self.clicked = gr.Textbox(elem_id="graph_clicked", elem_classes=[CLICKED_CLASS], show_label=False,
                                  container=False)
        self.graph = gr.State(None)
        self.components = [self.summary, self.plot, self.image, self.node, self.download, self.graph]

    def render(self, graph: ImageGraph, image: Image.Image, json_file: str, resize_mode: str) -> dict:
        classes = ", ".join(f"**{c}**" for c in graph.classes)
        summary = (f"Logit of {classes} · {len(graph.nodes)} of {graph.n_nodes} nodes and {len(graph.edges)} of "
                   f"{graph.n_edges} edges kept, carrying {100 * graph.node_share:.1f}% of the nodes' influence and "
                   f"{100 * graph.edge_share:.1f}% of the edges' · {graph.clt} replacing the {graph.tokens} tokens "
                   f"of blocks {graph.start}→{graph.n_layers - 1} · built in {1000 * graph.seconds:.0f} ms")
        return {self.summary: summary, self.plot: graph_figure(graph), self.graph: graph, self.download: json_file,
                self.image: self.patch_image(graph, image, resize_mode), self.node: ""}

    @staticmethod
    def patch_image(graph: ImageGraph, image: Image.Image, resize_mode: str, token: int | None = None
                    ) -> Image.Image:
        """The image with its patch nodes' influence, or with one patch token alone lit."""
        values = graph.patch_influence
        if token is not None:
            values = [1.0 if t == token - 1 else 0.0 for t in range(len(values))]
        return heat_overlay(image, values, graph.grid, max(values, default=0.0) or 1.0, size=220,
                            resize_mode=resize_mode)

    def empty(self, message: str = "") -> dict:
        return {self.summary: message, self.plot: None, self.image: None, self.node: "", self.download: None,
                self.graph: None}
