"""The contrastive (CLIP) setting: image-caption pairs, a CLIP as a zero-shot classifier, the
contrastive losses and training loop. What a trial does differently when the run has a ``clip``
section is the contrastive task (``tasks/contrastive.py``). Its attacks and defenses live with the others
(``attacks/badclip.py``, ``defenses/cleanclip.py``, ``defenses/bibau_clip.py``)."""
