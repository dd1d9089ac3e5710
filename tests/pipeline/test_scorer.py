import torch

from pipeline.scorer import Scorer


def test_rank_is_best_first_and_scores_match(tiny_pipeline):
    scorer = Scorer.from_text_encoder(tiny_pipeline.text_encoder)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 20, 20, generator=g)  # any size: resized to the tower's input
    order, scores = scorer.rank(images, "a red circle")
    assert sorted(order) == list(range(5)) and len(scores) == 5
    assert [scores[i] for i in order] == sorted(scores, reverse=True)
    # the score is the cosine of normalized CLIP features
    img_f = tiny_pipeline.text_encoder.model.encode_image(scorer.preprocess(images), normalize=True)
    txt_f = scorer.text_features(["a red circle"])
    torch.testing.assert_close(torch.tensor(scores), (img_f @ txt_f.T)[:, 0], rtol=1e-4, atol=1e-5)
    assert all(-1 <= s <= 1 for s in scores)
    # same image twice -> same score; the preprocessed tensor has the tower's size
    twice = scorer.score(torch.cat([images[:1], images[:1]]), "a red circle")
    torch.testing.assert_close(twice[0], twice[1])
    assert scorer.preprocess(images).shape[-2:] == scorer.image_size
