"""The DreamBooth operator (kopf). Importing the package registers its handlers, so that

    kopf run --standalone --all-namespaces -m dreambooth.operator

runs it as well as ``python -m dreambooth.operator`` or the ``dreambooth-operator`` command
(settings from ``DREAMBOOTH_*`` variables: :mod:`dreambooth.operator.settings`). The pure
parts (``naming``, ``resources``, ``status``, ``pods``, ``progress``, ``observed``) are
plain functions of their inputs; the handlers are the only I/O, with ``kube``.
"""

from dreambooth.operator import handlers as handlers  # registers the handlers
