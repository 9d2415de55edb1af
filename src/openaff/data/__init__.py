"""The data sets and their building blocks, for every task; nothing here knows a training configuration.

Modules: ``datasets`` (readers of Fashion-MNIST, CIFAR and image folders; ``ImageData``, ``resolve_source``,
``DATASET_STATS``), ``scenes`` (``fashion-mnist-scenes``: cluttered scenes with boxes and masks), ``splits``
(``load_data``: train / held-out validation / test of a named data set), ``loader`` (samplers, loaders and the
on-device batch pipeline). From a :class:`~openaff.training.config.TrainConfig` to loaders is
:func:`openaff.training.data.build_data`; segmentation's masks and VOC folders are :mod:`openaff.segmentation.data`.
"""
