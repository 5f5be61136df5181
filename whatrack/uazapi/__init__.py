"""UAZAPI: the pure webhook normalizer (dict in, typed events out) and the small send client the worker uses."""

from whatrack.uazapi.client import SendResult, UazapiClient
from whatrack.uazapi.normalizer import normalize, parse_body

__all__ = ["SendResult", "UazapiClient", "normalize", "parse_body"]
