"""Checks on a CT and on a segmentation that need no ground truth: the patient's trunk (:mod:`.body_mask`), the
scan's orientation (:mod:`.orientation`) and the sides of paired organs (:mod:`.laterality`)."""
