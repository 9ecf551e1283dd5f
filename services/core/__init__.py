"""The services' shared core: tiles, codecs, params, the stage base class and registry, the
streaming tile engine, the servicer and the server bootstrap."""
