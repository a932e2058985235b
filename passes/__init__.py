"""Graph passes of the turbo backend (installed as ``turbo_fx.passes``)."""
