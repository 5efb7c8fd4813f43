//! What is done to an inpainting mask and its output outside the sampler,
//! as diffusers' `VaeImageProcessor` does it with PIL: the mask's blur
//! (`blur`, PIL's `GaussianBlur`), the crop around the masked part that
//! `padding_mask_crop` inpaints at full size (`crop_region`), and the
//! overlay that puts the init image's own pixels back outside the mask
//! (`overlay`, `apply_overlay`). Each is written to give PIL's bytes, so a
//! mask and its settings mean here what they mean to diffusers. Also the
//! resize every input picture gets (`resized`) and an outpaint's canvas and
//! mask.

use image::{GrayImage, RgbImage};

/// A rectangle of an image, `x1..x2` × `y1..y2` (ends excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

impl Region {
    pub fn width(&self) -> u32 {
        self.x2 - self.x1
    }

    pub fn height(&self) -> u32 {
        self.y2 - self.y1
    }
}

/// The mask blurred as PIL's `GaussianBlur(radius)` blurs it: three box
/// blurs of a fractional width along the rows, then three down the columns,
/// each rounded to bytes, edges extended (Gwosdek et al.'s extended box
/// blur, in PIL's 24-bit fixed point). Radius 0 returns the mask as it is.
pub fn blur(mask: &GrayImage, radius: f32) -> GrayImage {
    if radius <= 0.0 {
        return mask.clone();
    }
    let r = box_radius(radius, 3);
    let (w, h) = mask.dimensions();
    let mut px = mask.as_raw().clone();
    let mut line = Vec::new();
    for _ in 0..3 {
        for row in px.chunks_exact_mut(w as usize) {
            line.clear();
            line.extend_from_slice(row);
            box_blur_line(&line, row, r);
        }
    }
    let mut column = vec![0u8; h as usize];
    let mut out = vec![0u8; h as usize];
    for x in 0..w as usize {
        for (y, c) in column.iter_mut().enumerate() {
            *c = px[y * w as usize + x];
        }
        for _ in 0..3 {
            box_blur_line(&column, &mut out, r);
            column.copy_from_slice(&out);
        }
        for (y, c) in column.iter().enumerate() {
            px[y * w as usize + x] = *c;
        }
    }
    GrayImage::from_raw(w, h, px).expect("same size as the mask")
}

/// The fractional box radius whose `passes` box blurs approximate a Gaussian
/// of standard deviation `radius` (PIL's `_gaussian_blur_radius`, in its
/// float and double steps).
fn box_radius(radius: f32, passes: u32) -> f32 {
    let sigma2 = radius * radius / passes as f32;
    let big_l = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let l = ((f64::from(big_l) - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One box blur of a line: each output is the sum of the `2r + 1` nearest
/// inputs at full weight and the two beyond at the fractional weight, in
/// 24-bit fixed point, the line's ends repeated past its edges.
fn box_blur_line(input: &[u8], out: &mut [u8], radius: f32) {
    let n = input.len() as i64;
    let r = radius as i64;
    let ww = ((1u32 << 24) as f32 / (radius * 2.0 + 1.0)) as u64;
    let fw = ((1u64 << 24) - (r as u64 * 2 + 1) * ww) / 2;
    let at = |i: i64| u64::from(input[i.clamp(0, n - 1) as usize]);
    let mut acc: u64 = (-r..=r).map(at).sum();
    for x in 0..n {
        let bulk = acc * ww + (at(x - r - 1) + at(x + r + 1)) * fw;
        out[x as usize] = ((bulk + (1 << 23)) >> 24) as u8;
        acc = acc + at(x + r + 1) - at(x - r);
    }
}

/// A picture at `width` × `height`: as it is when it has that size, else
/// resized as diffusers' pipelines resize their inputs (Lanczos).
pub fn resized<P>(
    img: image::ImageBuffer<P, Vec<P::Subpixel>>,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<P::Subpixel>>
where
    P: image::Pixel + 'static,
{
    if img.dimensions() == (width, height) {
        return img;
    }
    image::imageops::resize(&img, width, height, image::imageops::FilterType::Lanczos3)
}

/// An outpainting canvas of `width` × `height`: the init image resized into
/// `inner`, and the new canvas around it filled by carrying its edge pixels
/// outward (what shows through where an img2img strength below 1 keeps some
/// of the start; at strength 1 the model draws the margins from noise).
pub fn outpaint_canvas(init: RgbImage, width: u32, height: u32, inner: Region) -> RgbImage {
    let fitted = resized(init, inner.width(), inner.height());
    RgbImage::from_fn(width, height, |x, y| {
        let ix = x.clamp(inner.x1, inner.x2 - 1) - inner.x1;
        let iy = y.clamp(inner.y1, inner.y2 - 1) - inner.y1;
        *fitted.get_pixel(ix, iy)
    })
}

/// The mask an outpaint renders through: white over the new canvas, black
/// over `inner`, where the init image is.
pub fn outpaint_mask(width: u32, height: u32, inner: Region) -> GrayImage {
    GrayImage::from_fn(width, height, |x, y| {
        let kept = (inner.x1..inner.x2).contains(&x) && (inner.y1..inner.y2).contains(&y);
        image::Luma([if kept { 0 } else { 255 }])
    })
}

/// The smallest rectangle holding every non-black pixel of the mask, grown
/// by `pad` on each side (within the image), then widened or heightened
/// about its centre (shifted back inside the image where it would leave it)
/// to the aspect ratio of the `width` × `height` render it will be resized
/// to: diffusers' `get_crop_region`. `None` for a mask black everywhere,
/// which leaves nothing to inpaint.
pub fn crop_region(mask: &GrayImage, width: u32, height: u32, pad: u32) -> Option<Region> {
    let (w, h) = (i64::from(mask.width()), i64::from(mask.height()));
    let (mut left, mut right, mut top, mut bottom) = (w, -1i64, h, -1i64);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] != 0 {
            let (x, y) = (i64::from(x), i64::from(y));
            left = left.min(x);
            right = right.max(x);
            top = top.min(y);
            bottom = bottom.max(y);
        }
    }
    if right < 0 {
        return None;
    }
    let pad = i64::from(pad);
    let (mut x1, mut y1) = ((left - pad).max(0), (top - pad).max(0));
    let (mut x2, mut y2) = ((right + 1 + pad).min(w), (bottom + 1 + pad).min(h));
    let crop_ratio = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio = f64::from(width) / f64::from(height);
    // Python's `int()` truncates; its `//` floors (the differences are
    // never negative here, so the two agree).
    if crop_ratio > ratio {
        let diff = ((x2 - x1) as f64 / ratio - (y2 - y1) as f64) as i64;
        y1 -= diff.div_euclid(2);
        y2 += diff - diff.div_euclid(2);
        (y1, y2) = within(y1, y2, h);
    } else {
        let diff = ((y2 - y1) as f64 * ratio - (x2 - x1) as f64) as i64;
        x1 -= diff.div_euclid(2);
        x2 += diff - diff.div_euclid(2);
        (x1, x2) = within(x1, x2, w);
    }
    Some(Region {
        x1: x1 as u32,
        y1: y1 as u32,
        x2: x2 as u32,
        y2: y2 as u32,
    })
}

/// A span shifted back inside `0..size`, and cut to it where it is longer.
fn within(mut lo: i64, mut hi: i64, size: i64) -> (i64, i64) {
    if hi >= size {
        lo -= hi - size;
        hi = size;
    }
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    (lo, hi.min(size))
}

/// `img` cut to `region` and resized to `width` × `height` (Lanczos): what
/// a cropped inpaint renders from. The region has the render's aspect
/// ratio to within a pixel (`crop_region`), so this is diffusers' "fill"
/// resize but for that pixel.
pub fn crop_to<P>(
    img: &image::ImageBuffer<P, Vec<P::Subpixel>>,
    region: Region,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<P::Subpixel>>
where
    P: image::Pixel + 'static,
{
    let cut = image::imageops::crop_imm(img, region.x1, region.y1, region.width(), region.height())
        .to_image();
    resized(cut, width, height)
}

/// The inpainted output laid over the init image: where the mask is white
/// the output, where black the init image's own pixels, and between them
/// (a blurred edge) a blend, in PIL's integer arithmetic (diffusers'
/// `apply_overlay`: the init image pasted through the inverted mask into a
/// premultiplied layer, then alpha-composited over the output). With a
/// `crop` region the output (rendered from that region) is first resized
/// to it and put in its place; outside it the init image is kept.
pub fn overlay(
    init: &RgbImage,
    mask: &GrayImage,
    output: &RgbImage,
    crop: Option<Region>,
) -> RgbImage {
    let placed;
    let output = match crop {
        Some(region) => {
            let mut canvas = RgbImage::new(init.width(), init.height());
            let fitted = image::imageops::resize(
                output,
                region.width(),
                region.height(),
                image::imageops::FilterType::Lanczos3,
            );
            image::imageops::replace(
                &mut canvas,
                &fitted,
                i64::from(region.x1),
                i64::from(region.y1),
            );
            placed = canvas;
            &placed
        }
        None => output,
    };
    let div255 = |a: u32| {
        let t = a + 128;
        ((t >> 8) + t) >> 8
    };
    RgbImage::from_fn(init.width(), init.height(), |x, y| {
        let keep = 255 - u32::from(mask.get_pixel(x, y).0[0]);
        let under = output.get_pixel(x, y).0;
        if keep == 0 {
            return image::Rgb(under);
        }
        let init = init.get_pixel(x, y).0;
        image::Rgb(std::array::from_fn(|c| {
            // Premultiplied by the kept share, then back (truncating).
            let pre = div255(u32::from(init[c]) * keep);
            let over = if keep == 255 {
                pre
            } else {
                (255 * pre / keep).min(255)
            };
            // Alpha over an opaque output, 7 bits of extra precision.
            let coef1 = keep << 7;
            let coef2 = (255 << 7) - coef1;
            let t = over * coef1 + u32::from(under[c]) * coef2 + (0x80 << 7);
            ((((t >> 8) + t) >> 8) >> 7) as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc(w: u32, h: u32, cx: f32, cy: f32, r: f32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            image::Luma([if d <= r { 255 } else { 0 }])
        })
    }

    #[test]
    fn a_blur_spreads_the_edge_keeps_the_mass_and_leaves_flat_parts_alone() {
        let m = disc(96, 64, 48.0, 32.0, 16.0);
        let b = blur(&m, 4.0);
        // Far inside and far outside: unchanged.
        assert_eq!(b.get_pixel(48, 32).0[0], 255);
        assert_eq!(b.get_pixel(2, 60).0[0], 0);
        // The edge is a ramp now.
        let edge = b.get_pixel(64, 32).0[0];
        assert!(edge > 40 && edge < 215, "{edge}");
        assert!(b.get_pixel(67, 32).0[0] > 0);
        // The box blurs keep the total within rounding.
        let sum = |g: &GrayImage| g.pixels().map(|p| f64::from(p.0[0])).sum::<f64>();
        assert!((sum(&b) - sum(&m)).abs() / sum(&m) < 0.02);
        assert_eq!(blur(&m, 0.0), m);
    }

    #[test]
    fn the_crop_holds_the_mask_with_its_padding_at_the_renders_aspect() {
        let mut m = GrayImage::new(200, 100);
        for y in 40..50 {
            for x in 60..80 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        // 20×10 grown by 5 to 30×20, then to the 2:1 render's 40×20.
        let r = crop_region(&m, 200, 100, 5).unwrap();
        assert_eq!(
            r,
            Region {
                x1: 50,
                y1: 35,
                x2: 90,
                y2: 55
            }
        );
        // For a square render it grows in height instead, about its centre.
        let r = crop_region(&m, 64, 64, 5).unwrap();
        assert_eq!((r.width(), r.height()), (30, 30));
        assert_eq!((r.x1, r.y1), (55, 30));
        // Near an edge it is shifted back inside.
        let mut corner = GrayImage::new(100, 100);
        corner.put_pixel(99, 0, image::Luma([9]));
        let r = crop_region(&corner, 100, 50, 3).unwrap();
        assert_eq!(
            r,
            Region {
                x1: 92,
                y1: 0,
                x2: 100,
                y2: 4
            }
        );
        assert_eq!(crop_region(&GrayImage::new(8, 8), 8, 8, 4), None);
    }

    #[test]
    fn an_outpaint_canvas_holds_the_init_image_inside_and_its_edges_outside() {
        let init = RgbImage::from_fn(4, 2, |x, y| image::Rgb([x as u8 * 10, y as u8 * 100, 7]));
        let inner = Region {
            x1: 3,
            y1: 1,
            x2: 7,
            y2: 3,
        };
        let canvas = outpaint_canvas(init.clone(), 10, 5, inner);
        assert_eq!(canvas.dimensions(), (10, 5));
        // Inside: the init image as it is (already the inner size).
        assert_eq!(canvas.get_pixel(3, 1), init.get_pixel(0, 0));
        assert_eq!(canvas.get_pixel(6, 2), init.get_pixel(3, 1));
        // Outside: the nearest edge pixel, carried out.
        assert_eq!(canvas.get_pixel(0, 0), init.get_pixel(0, 0));
        assert_eq!(canvas.get_pixel(9, 4), init.get_pixel(3, 1));
        assert_eq!(canvas.get_pixel(5, 0), init.get_pixel(2, 0));
        let mask = outpaint_mask(10, 5, inner);
        assert_eq!(mask.get_pixel(3, 1).0[0], 0);
        assert_eq!(mask.get_pixel(6, 2).0[0], 0);
        assert_eq!(mask.get_pixel(7, 2).0[0], 255);
        assert_eq!(mask.get_pixel(4, 0).0[0], 255);
        assert_eq!(mask.pixels().filter(|p| p.0[0] == 0).count(), 8);
    }

    #[test]
    fn the_overlay_keeps_the_init_image_where_black_and_blends_between() {
        let init = RgbImage::from_pixel(8, 4, image::Rgb([200, 100, 10]));
        let out = RgbImage::from_pixel(8, 4, image::Rgb([0, 50, 250]));
        let mask = GrayImage::from_fn(8, 4, |x, _| {
            image::Luma([[0, 255, 128, 64][x as usize % 4]])
        });
        let o = overlay(&init, &mask, &out, None);
        assert_eq!(o.get_pixel(0, 0).0, [200, 100, 10]);
        assert_eq!(o.get_pixel(1, 0).0, [0, 50, 250]);
        let mid = o.get_pixel(2, 0).0;
        assert!(
            mid[0].abs_diff(100) <= 2 && mid[2].abs_diff(130) <= 2,
            "{mid:?}"
        );
        // Cropped: the output lands in the region, the rest is the init image.
        let mut m = GrayImage::new(8, 4);
        m.put_pixel(5, 2, image::Luma([255]));
        let region = Region {
            x1: 4,
            y1: 2,
            x2: 8,
            y2: 4,
        };
        let o = overlay(&init, &m, &out, Some(region));
        assert_eq!(o.get_pixel(5, 2).0, [0, 50, 250]);
        assert_eq!(o.get_pixel(1, 1).0, [200, 100, 10]);
        assert_eq!(o.get_pixel(6, 3).0, [200, 100, 10]);
    }
}
