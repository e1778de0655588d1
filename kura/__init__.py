"""kura: a build-artifact cache node on Twisted.

Serves the Xcode CAS, key-value, Gradle, module, Nx and Metro cache protocols
from durable local storage, replicates every write to its peers, and moves
large downloads with the kernel's sendfile/splice on the same port as
everything else. See ``docs/architecture.md`` for the map.
"""

__version__ = "0.1.0"
