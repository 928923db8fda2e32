"""The DreamBooth operator (kopf). Importing the package registers its handlers, so that

    kopf run --standalone --all-namespaces -m dreambooth.operator

runs it as well as ``python -m dreambooth.operator`` or the ``dreambooth-operator`` command
(settings from ``DREAMBOOTH_*`` variables: :mod:`dreambooth.operator.settings`). The pure
parts (``naming``, ``resources``, ``status``, ``pods``, ``progress``, ``observed``,
``restarts``, ``typedjobs``) are plain functions of their inputs; the ``reconciler``, built
once at startup by the kopf registrations in ``handlers``, does the I/O, through ``kube``.
"""

from dreambooth.operator import handlers as handlers  # registers the handlers
