"""The `lstream` command: pull, info, plan, run, bench, perplexity, serve. Each command lives in its own
module; this one only gathers them (nothing imports back into it)."""
from __future__ import annotations

import click

from .bench import bench
from .info import info
from .perplexity import perplexity
from .plan import plan
from .pull import pull
from .run import run
from .serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """LLM inference that streams quantized weights to the GPU and computes the rest on the CPU."""


for _command in (pull, info, plan, run, bench, perplexity, serve):
    cli.add_command(_command)


def main():
    cli(prog_name="lstream")


if __name__ == "__main__":  # python -m lstream.cli.main
    main()
