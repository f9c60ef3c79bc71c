"""The module panel's sections (segment, prompts, models, fine-tune), one small Qt class each, mixed into
``HSAMSlicerWidget`` in HSAMSlicer.py. Qt lives only here and in HSAMSlicer.py; HSAMSlicerLib stays Qt-free.
"""
