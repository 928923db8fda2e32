"""``dreambooth gallery``: a read-only web app to watch runs and look at their samples.

Layers (docs/gallery.md): pure functions compute what a page shows (``views``, ``curve``,
``outputs``, ``keys``), ``pages/`` turn that into HTML from the files in ``templates/``,
``sources`` find the jobs (the Kubernetes API through ``kube``, or a folder of local runs)
and ``objects`` reads a job's outputs (S3 or file://, read only, keys checked first);
``server`` is the aiohttp app: GET only, security headers, images proxied (the browser
never sees a credential). It imports the API layer, never the trainer (no torch).
"""
