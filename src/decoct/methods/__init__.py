"""The one method interface and its run loop (:mod:`~decoct.methods.base`); the methods themselves
live in their families (:mod:`decoct.matching`, :mod:`decoct.decoupled`)."""
