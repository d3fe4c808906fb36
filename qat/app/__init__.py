"""The recipe application built on the library: the ``qat`` command (:mod:`~qat.app.cli`), the
``qat run`` pipeline (:mod:`~qat.app.run`), results comparison for CI gates
(:mod:`~qat.app.compare`), the model zoo (:mod:`~qat.app.models`), the LightningModules
(:mod:`qat.app.tasks`) and the offline datasets (:mod:`qat.app.data`) the recipes train.

The library (everything outside ``qat.app``) never imports it."""
