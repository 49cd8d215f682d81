"""The scheduling pipeline: filters, scorers and a picker per profile, and a profile handler that
runs the profiles (prefill/decode disaggregation), configured like llm-d's endpoint picker.

:mod:`.config` loads an ``EndpointPickerConfig`` YAML file into a
:class:`.scheduler.SchedulingConfig` that a :class:`.scheduler.Scheduler` runs; :mod:`.plugins`
holds what every plugin is built on, :mod:`.registry` every type by name (one module per kind:
:mod:`.filters`, :mod:`.scorers`, :mod:`.pickers`, :mod:`.sizeclass`, :mod:`.pd`,
:mod:`.elsewhere`); :mod:`.prompt` turns a request into the token ids the engine will see;
:mod:`.enginestats` keeps the engines' scraped metrics.
"""
