#!/usr/bin/env python
"""Write prediction pictures of validation images.

``python tools/predict.py [CONFIG] --checkpoint PATH --out DIR [--num N] [key=value ...]``

One PNG per validation image (``DIR/0000.png`` ...): a row of the input, predicted and true segmentation
(fixed palette), predicted and true depth (colour map, common range), predicted and true normals
(``(n + 1) / 2`` as RGB), each panel under a caption.
"""

from __future__ import annotations

import sys

from mtvision.data.builders import build_dataset
from mtvision.engine import autocast_context
from mtvision.engine.cli import (checkpoint_tool_parser, config_from_args, exit_on_user_error,
                                 load_trained_model)
from mtvision.engine.visualize import write_prediction_pngs


@exit_on_user_error
def main(argv=None) -> int:
    parser = checkpoint_tool_parser(__doc__, out_help="output folder")
    parser.add_argument("--num", type=int, default=8, help="number of validation images (default 8)")
    args = parser.parse_intermixed_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    cfg = config_from_args(args)
    model, _, device = load_trained_model(cfg, args.checkpoint)
    dataset = build_dataset(cfg.data, "val", cfg.seed)
    paths = write_prediction_pngs(model, dataset, args.out, args.num, mean=cfg.data.mean, std=cfg.data.std,
                                  device=device, batch_size=cfg.data.batch_size,
                                  autocast=autocast_context(cfg.train.amp, device))
    print(f"wrote {len(paths)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
