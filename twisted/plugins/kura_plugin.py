"""twistd plugin: ``twistd kura`` starts a kura node (see kura.tap)."""

from twisted.application.service import ServiceMaker

kura = ServiceMaker(
    "kura",
    "kura.tap",
    "A build-artifact cache node with a same-port sendfile/splice accelerator.",
    "kura",
)
