"""The scheduling pipeline: filters, scorers and a picker, configured like llm-d's endpoint picker.

:mod:`.config` loads an ``EndpointPickerConfig`` YAML file into a :class:`.scheduler.Scheduler`;
:mod:`.plugins` holds the plugin types; :mod:`.prompt` turns a request into the token ids the
engine will see; :mod:`.enginestats` keeps the engines' scraped metrics.
"""
