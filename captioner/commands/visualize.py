"""``captioner visualize --ckpt M.ckpt IMAGE --out FIG.png [--save-maps maps.npz]``: the
attention figure of Xu et al. (2015, Figures 2-3), one panel per generated word."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.cli import register_tool
from captioner.commands.common import (EXIT_INPUT_ERROR, EXIT_OK, EXIT_USAGE, ToolError,
                                       add_cells_argument, figure_errors, load_captioner,
                                       make_tool, tool_parser)
from captioner.messages import one_line

if TYPE_CHECKING:
    from captioner.inference import Captioner

DISPLAY_MAX_SIDE = 640  # the figure's image is shrunk to this side (the maps do not change)



def _parse(argv: list[str]) -> argparse.Namespace:
    p = tool_parser("visualize", "Draw where the model looked for each generated word.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--out", required=True, help="figure file (.png, .pdf, .svg...)")
    p.add_argument("--save-maps", default=None, metavar="NPZ",
                   help="also save the raw attention maps (.npz)")
    p.add_argument("--cmap", default="gray", help="overlay colormap (gray, as the paper; jet...)")
    p.add_argument("--no-smooth", action="store_true", help="do not smooth the upsampled maps")
    p.add_argument("--with-end", action="store_true", help="add a panel for <end>")
    add_cells_argument(p)
    p.add_argument("--stn", default=None, metavar="FIGURE",
                   help="also draw each Spatial Transformer stage: the input with the sampling "
                        "grid's outline and the warped output")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    from captioner.data.images import ImageLoadError, load_image
    from captioner.visualize import figure_format, plot_attention, save_attention_maps

    import matplotlib

    # refused before the checkpoint is decoded and the image captioned
    if args.cmap not in matplotlib.colormaps:
        raise ToolError(f"--cmap {args.cmap}: not a matplotlib colormap (e.g. gray, jet, "
                        "viridis, magma; '_r' reverses one)", EXIT_USAGE)
    for option, figure in (("--out", args.out), ("--stn", args.stn)):
        if figure is None:
            continue
        try:
            figure_format(figure)
        except (OSError, ValueError) as e:
            raise ToolError(f"{option} {figure}: {one_line(e)}", EXIT_USAGE) from None
        if Path(figure).resolve() == Path(args.image).resolve():
            raise ToolError(f"{option} {figure} is the input image; give another file name",
                            EXIT_USAGE)
    captioner = load_captioner(args)
    if args.stn and not _stn_stages(captioner):  # before anything is written
        raise ToolError("--stn: the model has no Spatial Transformer stage", EXIT_USAGE)
    try:
        image = load_image(args.image)
    except ImageLoadError as e:
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    (c,) = captioner.caption([image], beam_size=args.beam_size, max_length=args.max_length)
    n = len(c.tokens) if args.with_end else len(c.words)
    words = [*c.words, "<end>"][:n]
    betas = c.betas[:n] if captioner.has_gate else None
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))  # keeps the aspect ratio
    hard = getattr(captioner.decoder, "hard", None)
    # hard attention with the argmax rule at test time: the one location chosen for each word
    # (with the expectation rule every location contributes, so no cell is outlined)
    chosen = hard is not None and getattr(hard, "test_rule", "argmax") == "argmax"
    H, W = captioner.grid_size
    locations = c.alphas[:n].reshape(n, H * W).argmax(-1) if chosen else None  # (n,)
    with figure_errors(args.out):
        figure = plot_attention(shown, words, c.alphas[:n], captioner.grid_size, args.out,
                                betas=betas, hard_locations=locations, smooth=not args.no_smooth,
                                cmap=args.cmap, title=c.text or "(empty caption)",
                                theta=c.grid_theta, edges=c.cell_edges)
    print(f"{args.image}\t{c.text}")
    print(f"figure: {figure}")
    if args.stn:
        with figure_errors(args.stn):
            print(f"stn: {_draw_stn(captioner, image, args.stn)}")
    if args.save_maps:
        with figure_errors(args.save_maps):
            maps = save_attention_maps(args.save_maps, words, c.alphas[:n],
                                       captioner.grid_size, betas=betas,
                                       hard_locations=locations,
                                       image_size=(image.height, image.width),
                                       theta=c.grid_theta, edges=c.cell_edges)
        print(f"maps: {maps}")
    return EXIT_OK


def _stn_stages(captioner: Captioner) -> list[Any]:
    from captioner.encoders.stn import SpatialTransformer

    return [s for s in captioner.encoder.stages if isinstance(s, SpatialTransformer)]


def _draw_stn(captioner: Captioner, image: Any, out: str) -> Path:
    """Run the encoder once and draw the first Spatial Transformer stage's warp."""
    import torch

    from captioner.autocast import inference_autocast
    from captioner.visualize import plot_stn

    stages = _stn_stages(captioner)
    batch = captioner.preprocess(image).unsqueeze(0)  # (1, 3, H, W)
    with torch.no_grad(), inference_autocast(captioner.device, captioner.precision):
        captioner.encoder(batch.to(captioner.device))  # as when captioning: the same warp
    stage = stages[0]
    theta = stage.input_theta() if hasattr(stage, "input_theta") else stage.last_theta[:, 0]
    # at the input the stage pads the normalised image with zeros: the normalisation mean
    fill = captioner.encoder.mean.flatten().cpu() if stage.where == "input" else None
    return Path(plot_stn(batch, theta.cpu(), out, fill=fill))


main = make_tool("visualize", _parse, _run)
register_tool("visualize", main)
