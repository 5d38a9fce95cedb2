"""Shared fixtures: small artefacts built on the fly, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

# A few dozen report-style sentences: enough for a WordPiece vocabulary that covers the captions the tests use.
CLINICAL_SENTENCES = [
    "No acute cardiopulmonary process.",
    "The lungs are clear without focal consolidation, effusion or pneumothorax.",
    "Heart size is normal. Mediastinal contours are unremarkable.",
    "Mild cardiomegaly with small bilateral pleural effusions.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Left basilar atelectasis. No pneumothorax.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Nasogastric tube courses below the diaphragm.",
    "Moderate pulmonary edema, worse than prior.",
    "Stable appearance of the chest compared to the prior study.",
    "Chest radiograph shows a right-sided pleural effusion.",
    "Axial CT of the abdomen shows a hypodense liver lesion.",
    "MRI of the brain demonstrates no acute infarct.",
    "Fracture of the distal radius without displacement.",
    "Histopathology shows invasive ductal carcinoma.",
    "Fundus photograph with signs of diabetic retinopathy.",
    "Skin lesion consistent with melanoma.",
    "Ultrasound of the thyroid shows a solid nodule.",
    "There is no evidence of pneumothorax or pleural effusion.",
    "Patchy opacities in both lungs, possibly atypical infection.",
    "Calcified granuloma in the right upper lobe.",
    "Degenerative changes of the thoracic spine.",
    "Sternotomy wires and mediastinal clips are present.",
    "Central venous catheter tip in the superior vena cava.",
    "Interval improvement of the left lower lobe consolidation.",
    "Hyperinflated lungs consistent with emphysema.",
    "Small left apical pneumothorax.",
    "Enlarged cardiac silhouette and pulmonary vascular congestion.",
    "Hilar lymphadenopathy is suspected.",
    "Normal chest x-ray.",
    "a chest x-ray showing pneumonia",
    "a chest x-ray with no finding",
    "a photo of a chest x-ray with cardiomegaly",
    "a CT scan of the lung with a nodule",
    "an MRI of the knee with a meniscal tear",
    "findings: effusion, edema and consolidation.",
    # words of the evaluator tests' class names and prompts
    "a photo of a normal chest radiograph",
    "histopathology image of lymph node tissue with metastatic tumor",
    "an MRI of the brain, a CT scan of the abdomen, an ultrasound image",
    "skin lesion consistent with melanoma, fundus photograph, endoscopy",
    "xray ct mri cat dog red green blue class zero one two",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A BERT-style WordPiece tokenizer (``[PAD]=0``, uncased, ``[CLS] text [SEP]``) saved with ``save_pretrained``.

    Its vocabulary (< 1000 tokens) fits the 4096-token embedding of the ``tiny`` preset's BERT.
    """
    # data_prep's builder, not tokenizers' WordPieceTrainer: that trainer breaks ties between merges in hash-map
    # order, so each test session got a different vocabulary and training tests a different run.
    from data_prep.tokenizer import train_wordpiece

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_wordpiece(CLINICAL_SENTENCES, out, vocab_size=1000)
    return Path(out)
