"""``python -m kura.config``: print ``docs/configuration.md``."""

import sys

from kura.config.node import render_markdown

sys.stdout.write(render_markdown())
